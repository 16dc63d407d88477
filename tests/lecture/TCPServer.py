from socket import *
import sys
serverPort = int(sys.argv[1]) if len(sys.argv) > 1 else 12000
serverSocket = socket(AF_INET,SOCK_STREAM)
serverSocket.bind(('',serverPort))
serverSocket.listen(1)
print('The server is ready to receive on port', serverSocket.getsockname()[1], flush=True)
while 1:
     connectionSocket, addr = serverSocket.accept()

     sentence = connectionSocket.recv(2048)
     capitalizedSentence = sentence.upper()
     connectionSocket.send(capitalizedSentence)
     connectionSocket.close()
